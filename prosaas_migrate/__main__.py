from prosaas_migrate.cli import main

main()
