//! Test vectors for firmware authors, generated from the real codec and signer.
