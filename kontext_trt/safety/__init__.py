"""Content safety and provenance: output filter, invisible watermark, C2PA manifests."""
