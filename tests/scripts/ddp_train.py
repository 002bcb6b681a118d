"""Train a tiny CellPLM with N CPU processes (Lightning DDP, gloo) and dump the loss curve.

Used by tests/test_ddp.py: ``python tests/scripts/ddp_train.py OUT.json N_DEVICES``.
"""

import json
import os
import sys

import scvi

import cellplm_scvi as cp


def main(out: str, devices: int) -> None:
    scvi.settings.seed = 0
    adata = cp.datasets.simulate_tissue(n_cells=1600, n_slides=2, seed=0)
    cp.CellPLM.setup_anndata(
        adata, layer="counts", spatial_key="spatial", library_key="slide", max_cells=100
    )
    # the GMVAE: the VAE's KL warm-up makes the loss curve depend more on the number of steps
    # (DDP takes half as many per epoch)
    model = cp.CellPLM(adata, n_hidden=32, n_layers=1, n_latent=8, latent="gmvae")
    kwargs = {"strategy": "ddp", "devices": devices} if devices > 1 else {"devices": 1}
    model.train(
        max_epochs=6,
        accelerator="cpu",
        train_size=1.0,
        lr=1e-3,
        enable_progress_bar=False,
        **kwargs,
    )
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        loss = model.history["train_loss"]["train_loss"].astype(float).tolist()
        with open(out, "w") as f:
            json.dump({"train_loss": loss, "world_size": model.trainer.world_size}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
