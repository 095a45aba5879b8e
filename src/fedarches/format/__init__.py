"""What the coordinator and the sites agree on: bytes, names and signatures.

Both ``server/`` and ``client/`` import this package; it imports neither (nor
the Flower layer, nor the CLI). Modules: ``canonical`` (canonical JSON, hashes),
``tensor_keys`` (the one place tensor keys are built), ``model_dir`` (a model
directory on disk), ``version`` (a published atlas version and the lineage),
``bundle`` (a signed contribution bundle), ``signing`` (Ed25519 keys),
``metrics`` (the scalar metrics that may travel).
"""
