#!/bin/bash
export PYTHONPATH=/work/authors/stubs OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python; SRC=/work/authors/prieto/grokking_experiments.py; R=/work/authors/runs
run() { name=$1; shift; mkdir -p $R/$name; cd $R/$name; echo "$PY $SRC $*" > cmd.txt; /usr/bin/time -v nice -n 10 $PY $SRC "$@" > log.txt 2> err.txt; }
while kill -0 5738 2>/dev/null; do sleep 5; done
for s in 0 1 2; do
  run prieto_orthograd_s$s --lr 0.01 --num_epochs 1500 --log_frequency 10 --train_fraction 0.6 --modulo 31 --input_size 31 --orthogonal_gradients --beta2 0.99 --weight_decay 0 --seed $s
done
run prieto_ce32_s0 --lr 0.01 --num_epochs 15000 --log_frequency 250 --train_fraction 0.8 --modulo 31 --input_size 31 --softmax_precision 32 --beta2 0.999 --adam_epsilon 1e-25 --weight_decay 0 --seed 0
for s in 1 2; do
  run prieto_stablemax_s$s --lr 0.01 --num_epochs 35000 --log_frequency 100 --train_fraction 0.8 --modulo 31 --input_size 31 --loss_function stablemax --beta2 0.999 --adam_epsilon 1e-25 --weight_decay 0 --seed $s
done
echo DONE > $R/queue_prieto.done
#!/bin/bash
export OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python; SRC=/work/authors/grokfast/main.py; R=/work/authors/runs
run() { name=$1; shift; mkdir -p $R/$name/results; cd $R/$name; echo "$PY $SRC $*" > cmd.txt; /usr/bin/time -v nice -n 10 $PY $SRC "$@" 2>&1 | grep -a "EPOCH\|Elapsed\|Maximum resident\|Error\|error" > log.txt; }
for s in 0 1 2; do
  run grokfast_ema_s$s --label s$s --seed $s --filter ema --alpha 0.98 --lamb 2.0 --weight_decay 0.005 --budget 1500
done
run grokfast_none_s0 --label s0 --seed 0 --weight_decay 0.005 --budget 3000
echo DONE > $R/queue_grokfast.done
#!/bin/bash
export OMP_NUM_THREADS=1
cd /work/authors/runs
PY=/work/main/.venv/bin/python
nice -n 10 $PY fg_run.py stablemax_eps1e-25 '{"p":31,"train_frac":0.8,"lr":0.01,"wd":0.0,"loss":"stablemax","eps":1e-25,"seeds":3,"steps":35000,"eval_every":100,"compile":"off","device":"cpu"}' > fg/stablemax_eps1e-25.log 2>&1
nice -n 10 $PY fg_run.py orthograd_f06 '{"p":31,"train_frac":0.6,"lr":0.01,"wd":0.0,"orthograd":true,"seeds":3,"steps":2000,"eval_every":10,"compile":"off","device":"cpu"}' > fg/orthograd_f06.log 2>&1
echo DONE > queue_fg.done
#!/bin/bash
export OMP_NUM_THREADS=1
cd /work/authors/runs
PY=/work/main/.venv/bin/python
nice -n 10 $PY fg_run.py ce_eps1e-25 '{"p":31,"train_frac":0.8,"lr":0.01,"wd":0.0,"loss":"ce","eps":1e-25,"seeds":1,"steps":12000,"eval_every":200,"compile":"off","device":"cpu"}' > fg/ce_eps1e-25.log 2>&1
echo DONE > queue_extra2.done
#!/bin/bash
export OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python; SRC=/work/authors/grokfast/main.py; R=/work/authors/runs
while [ ! -f $R/queue_grokfast.done ]; do sleep 5; done
name=grokfast_none_s1; mkdir -p $R/$name/results; cd $R/$name; args="--label s1 --seed 1 --weight_decay 0.005 --budget 3000"
echo "$PY $SRC $args" > cmd.txt; /usr/bin/time -v nice -n 10 $PY $SRC $args 2>&1 | grep -a --line-buffered "EPOCH\|Elapsed\|Maximum resident\|Error\|error" > log.txt
echo DONE > $R/queue_gf2.done
#!/bin/bash
export OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python; SRC=/work/authors/grokfast/main.py; R=/work/authors/runs
while [ ! -f $R/queue_gf2.done ]; do sleep 2; done
run() { name=$1; shift; mkdir -p $R/$name/results; cd $R/$name; echo "$PY $SRC $*" > cmd.txt; /usr/bin/time -v nice -n 10 $PY $SRC "$@" 2>&1 | grep -a --line-buffered "EPOCH\|Elapsed\|Maximum resident\|Error\|error" > log.txt; }
run grokfast_none_s2 --label s2 --seed 2 --weight_decay 0.005 --budget 3000 &
run grokfast_none_wd0_s0 --label s0 --seed 0 --budget 3000 &
wait
echo DONE > $R/queue_gf3.done
#!/bin/bash
# issue 30 item 3: Prieto et al.'s MLP and draw in fastgrok (fg_run.py's PRIETO), branch peer-mlp, 2026-12-07;
# run directories copied to fastgrok_mlp_* here (checkpoints left out)
export OMP_NUM_THREADS=1
cd benchmarks/results/peer_repro
PY=.venv/bin/python; O=/tmp/fgruns
nice -n 5 $PY fg_run.py mlp_stablemax_f08 '{"prieto":true,"train_frac":0.8,"loss":"stablemax","eps":1e-25,"seeds":3,"steps":35000,"eval_every":100}' $O > $O/mlp_stablemax_f08.log 2>&1
nice -n 5 $PY fg_run.py mlp_orthograd_f06 '{"prieto":true,"train_frac":0.6,"orthograd":true,"seeds":3,"steps":2000,"eval_every":10}' $O > $O/mlp_orthograd_f06.log 2>&1
nice -n 5 $PY fg_run.py mlp_ce32_f08 '{"prieto":true,"train_frac":0.8,"loss":"ce","eps":1e-25,"seeds":2,"steps":15000,"eval_every":250,"logit_every":500}' $O > $O/mlp_ce32_f08.log 2>&1
