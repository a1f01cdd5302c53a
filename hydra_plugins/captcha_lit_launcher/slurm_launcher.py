try:
    from captcha_lit.training import slurm
except ModuleNotFoundError as missing:  # without the scale extra there is no submitit launcher to extend
    if missing.name != "hydra_plugins.hydra_submitit_launcher":
        raise
    slurm = None

if slurm is not None:

    class SlurmLauncher(slurm.SlurmLauncher):
        __doc__ = slurm.__doc__
