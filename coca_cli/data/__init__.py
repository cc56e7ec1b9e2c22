"""What goes into the model: the BPE tokenizer, image transforms, image files loaded in batches,
training tables and webdataset shards, MSCOCO preparation and its download."""
