import torch

from models.autoencoder import IdentityAutoencoder


def test_identity_autoencoder_normalises_and_inverts():
    ae = IdentityAutoencoder(scale=2.0, shift=0.5)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    z = ae.encode(x)
    assert torch.allclose(z, (x - 0.5) * 2.0)
    assert torch.allclose(ae.decode(z), x)
    assert ae.latent_shape(3, 8, 8) == (3, 8, 8)
