"""Shards to training data: patient-level splits and the streamed, shuffled, balanced batches."""
