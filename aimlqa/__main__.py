from aimlqa.cli import main

main()
