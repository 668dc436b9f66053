"""CelebA (folder or zip) to WebDataset shards and manifest, and the streams that read them back."""
