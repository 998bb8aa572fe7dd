"""Stage 9, cli: the `felix` command, one parser per stage built from one place. Imports any stage; nothing imports it
but felix.__main__ and the console script."""
