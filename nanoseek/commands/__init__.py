"""One module per CLI command; each defines main(argv). Nothing imports this package."""
