"""Grounding: boxes and points in answers, kept right through every resize.

Each family writes boxes its own way (its `box_convention`, declared in qwenvl_ft/families): relative coordinates
on a grid over the image (0-999 or 0-1000), or absolute pixels of the image *after* the resize the run applies;
inside box tokens or as JSON objects. This package turns those declarations into coordinates and text:

- convention.py: the type of a convention (which frame, which grid, which text form);
- coords.py: maps between a dataset's coordinates (pixels of the original image, relative 0-1, or already the
  family's), the family's coordinates and the original image's pixels;
- text.py: writes objects (label + box or point) in a family's text form and parses them back from any answer;
- geometry.py: IoU, matched IoU, point in box;
- draw.py: boxes and points drawn on an image (PIL, imported when drawing).

It imports only the standard library (draw.py PIL, when called), so rewards (one layer up) and data-check stay
torch-free.
"""
