from blackbox_smooth.cli import main

main()
