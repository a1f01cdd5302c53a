from captcha_lit.bench.run import main

main()
