"""The Graphs part."""
