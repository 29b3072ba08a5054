"""HTTP layers: thin translations of client APIs onto the gateway."""
