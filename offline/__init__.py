"""The offline path that makes and judges the adapter: LoRA training, the response selector's
and the fit judge's training, evaluation, blind reading. It sits above the engine (it generates
with it) and is used only from the command line; nothing at run time imports it."""
