from erc.cli.main import app

app(prog_name="erc")
