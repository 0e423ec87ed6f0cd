"""t5lite.data: SeqIO objectives, tasks and the input pipeline.

objectives.py    noise masks, sentinels, lengths (TF ops + NumPy entry points)
denoisers.py     span corruption / prefix LM / UL2 as configuration, planned against lengths
preprocessors.py the tf.data preprocessors that apply them;  bart.py: BART denoising
vocab.py         train / load SentencePiece vocabularies
sources.py       text / JSONL data source;  tasks.py: register your own task in a few lines
registry.py      task lookup by name;  pipeline.py: DataConfig -> fixed-shape NumPy batches
metrics.py       metric functions for supervised tasks
preview.py       a task's first examples as the model sees them (`t5lite data`)

Nothing is imported here: TensorFlow loads only when a data module is used.
"""
