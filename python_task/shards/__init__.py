"""The tile shard: its HDF5 format, the folder's manifest, and ``extract`` (annotated slides -> shards)."""
