"""The part Generative models: the yardstick every generator is measured with, GANs
(the minimax game, WGAN-GP, CycleGAN, StyleGAN), variational autoencoders (VAE, CVAE,
VQ-VAE), diffusion (DDPM, DDIM, latent diffusion with classifier-free guidance),
PixelCNN and normalizing flows, and the generators compared side by side."""
