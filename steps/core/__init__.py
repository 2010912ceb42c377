"""What every step shares: the contract between steps (file names, the ignore label, the strict
config model), errors, content-addressed keys (lineage), the artifact store, devices and the
worker processes of the data steps."""
