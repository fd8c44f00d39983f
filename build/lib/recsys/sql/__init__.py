"""Every SQL statement recsys runs, one file each; installed as the package ``recsys.sql``."""
