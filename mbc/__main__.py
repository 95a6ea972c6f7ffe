from mbc.cli import main

main()
