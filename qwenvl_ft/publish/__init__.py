"""What leaves the run folder: the model card of `final/` and `merged/` (card.py) and the upload to the Hugging Face
Hub (hub.py). Both sit beside modeling/ and import only config/ and the libraries, so that the training run and
`qwenvl-ft merge` can call them."""
