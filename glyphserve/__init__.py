"""glyphserve: answer questions about long documents the way Glyph does.

Data flows one way: ``ingest`` (files to text) -> ``render`` (text to page images)
-> ``engine`` (pages + questions to tokens) -> ``serve`` (HTTP and web UI).
"""

__version__ = "0.1.0"
