"""One adapter per model family; each turns a model into ordered units."""
