from pbt_server.cli import main

raise SystemExit(main())
