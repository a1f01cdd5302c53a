from captcha_lit.bench.cli import main

main()
