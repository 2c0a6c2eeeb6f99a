"""Model files above the models: native runs and exports, Stable Diffusion single files (.safetensors, .ckpt),
diffusers folders and bare components, each read into and written from one in-memory form."""
