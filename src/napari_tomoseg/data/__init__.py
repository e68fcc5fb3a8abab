"""Reading and preparing data: tomograms (MRC, OME-Zarr), boxes, annotations and their
autosave, preprocessing, the probability encoding."""
