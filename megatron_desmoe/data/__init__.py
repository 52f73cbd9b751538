"""Domain data pipeline: user files -> Megatron indexed datasets with loss masks and domain ids.

    formats.py     containers, record formats, field mapping
    templates.py   the prompt template ("User: ...\\nAssistant: ..." + EOS)
    tokenizer.py   SentencePiece training / Hugging Face loading, fingerprints
    sources.py     domain sources from --input flags or YAML, checked before work starts
    preprocess.py  multi-process tokenizing into .bin/.idx + blend.json (atomic)
    blend.py       blend.json writing and loading
    dataset.py     DomainGPTDataset and build_domain_datasets (Megatron-Core builders)
    sampler.py     mixed / domain-pure micro-batches, collate
    cli.py, tokenizer_cli.py   desmoe-preprocess, desmoe-train-tokenizer

Importing this package is light; dataset.py imports Megatron-Core. See docs/data.md.
"""
