from mbc.cli.main import main

main()
