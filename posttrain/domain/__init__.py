"""Pure data shared by every layer: no I/O, no torch, no imports from sibling packages."""
