"""Engines that make training data outside this process: vLLM as a server in its own environment, talked to
over HTTP and the shared filesystem (`vllm_engine`), with the KV connector vLLM loads by module path
(`vllm_connector`, which imports only vLLM, torch and safetensors). The package never imports vLLM."""
