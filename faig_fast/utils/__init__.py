"""Small shared helpers: atomic file writing and where bundled assets and data live."""
