"""The data factory: read data files, filter (heuristics, dedup, diversity), decontaminate, describe.

Modules, one job each:

- :mod:`~tunegraph.data.sources`: records from JSONL, JSON and Parquet files, each with its location;
- :mod:`~tunegraph.data.text`: the text of a row as the filters see it, normalization, word n-grams;
- :mod:`~tunegraph.data.heuristics`: length, repetition, empty and refusal rules, each with a reason;
- :mod:`~tunegraph.data.dedup`: exact (normalized-text hash) and near (MinHash-LSH) duplicates;
- :mod:`~tunegraph.data.embedder`: all-MiniLM-L6-v2 sentence embeddings (bundled, offline);
- :mod:`~tunegraph.data.diversity`: seeded k-means and a selection spread over the clusters;
- :mod:`~tunegraph.data.decontaminate`: n-gram and embedding overlap with eval sets;
- :mod:`~tunegraph.data.removals`: what a filter removed and why, and the funnel of counts;
- :mod:`~tunegraph.data.data_card`: the data card (funnel, reasons, histograms) of a dataset artifact.

Nothing is imported here, so reading a data file does not load torch or the embedder.
"""
