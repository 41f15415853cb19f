from metergate.cli import main

main()
