<?php
// Drives the PHP gearman extension (Debian php-gearman, libgearman underneath) for the
// compatibility matrix. Usage: php client.php SPEC.json; prints one JSON object.
$spec = json_decode(file_get_contents($argv[1]), true);
[$host, $port] = explode(':', $spec['server']);
$client = new GearmanClient();
// addServer's third argument (default true) asks the server for exceptions (OPTION_REQ)
$exceptions = !empty($spec['exceptions']);
$client->addServer($host, (int)$port, $exceptions);
$client->setTimeout(60000);
$workload = isset($spec['workload_file']) ? file_get_contents($spec['workload_file']) : '';
$unique = $spec['unique'] ?? null;
$out = [];

if ($spec['op'] === 'background') {
    $out['handle'] = $client->doBackground($spec['function'], $workload, $unique);
    $out['return_code'] = $client->returnCode();
} else {
    $count = $spec['op'] === 'pair' ? 2 : 1;
    $runs = [];
    for ($i = 0; $i < $count; $i++) {
        $runs[$i] = ['status' => [], 'data' => [], 'warnings' => [], 'failed' => false,
                     'result' => null, 'exception' => null];
    }
    $client->setCompleteCallback(function ($task, $ctx) use (&$runs) {
        $runs[$ctx]['result'] = bin2hex($task->data());
    });
    $client->setFailCallback(function ($task, $ctx) use (&$runs) {
        $runs[$ctx]['failed'] = true;
    });
    $client->setExceptionCallback(function ($task, $ctx) use (&$runs) {
        $runs[$ctx]['exception'] = $task->data();
    });
    $client->setStatusCallback(function ($task, $ctx) use (&$runs) {
        $runs[$ctx]['status'][] = [$task->taskNumerator(), $task->taskDenominator()];
    });
    $client->setDataCallback(function ($task, $ctx) use (&$runs) {
        $runs[$ctx]['data'][] = bin2hex($task->data());
    });
    $client->setWarningCallback(function ($task, $ctx) use (&$runs) {
        $runs[$ctx]['warnings'][] = bin2hex($task->data());
    });
    $contexts = range(0, $count - 1);  // addTask keeps a reference: one variable per task
    for ($i = 0; $i < $count; $i++) {
        if (!$client->addTask($spec['function'], $workload, $contexts[$i], $unique)) {
            fwrite(STDERR, "addTask: " . $client->error() . "\n");  // e.g. an empty workload
            exit(2);
        }
    }
    $ok = $client->runTasks();
    $out['return_code'] = $client->returnCode();
    $out['runs'] = $runs;
    if ($spec['op'] === 'normal') {
        // doNormal: what a plain synchronous call returns, with the return code
        $client2 = new GearmanClient();
        $client2->addServer($host, (int)$port, $exceptions);
        $client2->setTimeout(60000);
        $result = $client2->doNormal($spec['function'], $workload, $unique);
        $out['normal'] = ['result' => bin2hex($result), 'return_code' => $client2->returnCode(),
                          'error' => $client2->error()];
    }
}
echo json_encode($out), "\n";
