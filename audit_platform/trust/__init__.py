"""The trail made verifiable: a Merkle log per source, signed checkpoints and proofs (the
end-to-end check of records against it is ``audit_platform.verify``)."""
