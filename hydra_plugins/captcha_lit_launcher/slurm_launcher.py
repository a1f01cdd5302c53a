from captcha_lit.training import slurm


class SlurmLauncher(slurm.SlurmLauncher):
    __doc__ = slurm.__doc__
