"""Applying: tiled inference, merging maps into one mask, picking, suggested boxes, 3D
rendering, batch runs on a Dask cluster, and copick projects (results out, tomograms and
segmentations in)."""
