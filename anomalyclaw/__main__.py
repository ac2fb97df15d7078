from anomalyclaw.cli import main

raise SystemExit(main())
