from distprompt_jax.report.page import run

run()
