"""`python benchmarks/kernel_threads.py [DATA_DIR]`: epoch time of the same smoke training in a notebook kernel: (a) without OMP_WAIT_POLICY
(a JupyterLab kernel before the setup cell existed), (b) the same kernel after the notebooks'
setup cell, (c) with OMP_WAIT_POLICY=PASSIVE exported as make report does; each while another
training process competes for the 2 cores."""
import json, os, subprocess, sys
import nbformat
from nbclient import NotebookClient

TRAIN = """
import time, torch
from samlib.config import resolve
from samlib.data import load_cifar10
from samlib.run import train
ds = load_cifar10(%r)
cfg = resolve('final', 'smoke', epochs=4, seed=%d)
t = time.time(); run = train(cfg, dataset=ds, out=__import__('tempfile').mkdtemp(), device='cpu', progress=False)
import csv; print('EPOCHS', [float(r['seconds']) for r in csv.DictReader(open(run / 'metrics.csv'))])
"""
SETUP = "from samlib.report.colab import setup\nfolders = setup()\nimport os; print('OMP', os.environ.get('OMP_WAIT_POLICY'))"
def run(cells, env, seed):
    nb = nbformat.v4.new_notebook(); nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    old = dict(os.environ); os.environ.clear(); os.environ.update(env)
    try:
        NotebookClient(nb, kernel_name="python3", timeout=900).execute()
    finally:
        os.environ.clear(); os.environ.update(old)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.outputs)
    return [l for l in text.splitlines() if l.startswith(("EPOCHS", "OMP"))]
DATA = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else 'data')
base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
competitor = subprocess.Popen([sys.executable, "-c", "import torch\nx=torch.randn(2000,2000)\nwhile True: x@x"],
                              env=dict(base, OMP_WAIT_POLICY="PASSIVE"))
try:
    res = {"a_kernel_no_setup": run([TRAIN % (DATA, 1)], base, 1),
           "b_kernel_with_setup_cell": run([SETUP, TRAIN % (DATA, 2)], base, 2),
           "c_like_make_report": run([TRAIN % (DATA, 3)], dict(base, OMP_WAIT_POLICY="PASSIVE"), 3)}
finally:
    competitor.kill()
print(json.dumps(res, indent=1))
