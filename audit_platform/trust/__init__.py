"""The trail made verifiable: a Merkle log per source, signed checkpoints, proofs, verify."""
