"""Record loaders, tokenizers and grain pipelines."""
