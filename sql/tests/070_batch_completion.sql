-- Batch completion: complete_slave_commands(p_completions jsonb), the outcome of several commands
-- in one call, with the rules of complete_slave_command and fail_slave_command.
begin;
\ir fixtures/world.sql
select plan(34);

select has_function('public', 'complete_slave_commands', array['jsonb'], 'complete_slave_commands(jsonb) exists');
select is((select prosecdef from pg_proc where oid = 'public.complete_slave_commands(jsonb)'::regprocedure), true,
  'complete_slave_commands is SECURITY DEFINER');
select ok((select 'search_path=""' = any (proconfig) from pg_proc where oid = 'public.complete_slave_commands(jsonb)'::regprocedure),
  'complete_slave_commands has an empty search_path');

-- Slave A: 14:33:5C:38:BF:60, slave B: 14:33:5C:38:BF:61, both on ESP32_ALICE_1.
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}') returning id as a1 \gset
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{2}', '{on}', '{60}') returning id as a2 \gset
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:61', '{1,2}', '{on,on}', '{0,0}') returning id as b1 \gset
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:61', '{1}', '{off}', '{0}') returning id as b2 \gset
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:62', '{0}', '{on}', '{0}') returning id as c1 \gset
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:62', '{3}', '{on}', '{0}') returning id as c2 \gset
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_BOB_1', '14:33:5C:38:BF:70', '{0}', '{on}', '{0}') returning id as bob1 \gset
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '10 minutes', now() - interval '1 second') as stale \gset

select tests.as_agent('pi-alice');
select is((select count(*)::int from get_and_lock_slave_commands('ESP32_ALICE_1', 10)), 6,
  'the six open commands of ESP32_ALICE_1 are locked; the stale one is expired');

-- A mixed batch.
select results_eq(
  format($q$select id, status, execution_time_ms, error_message from complete_slave_commands(%L)$q$,
         jsonb_build_array(
           jsonb_build_object('command_id', :a1, 'status', 'completed', 'execution_time_ms', 100),
           jsonb_build_object('command_id', :a2, 'status', 'failed', 'execution_time_ms', 20,
                              'error_message', 'slave offline'))),
  format('values (%s::bigint, %L::text, 100, null::text), (%s::bigint, %L::text, 20, %L::text)',
         :a1, 'completed', :a2, 'failed', 'slave offline'),
  'a mixed batch completes one command and fails the other, and returns both in the batch''s order');
select is((select count(*)::int from relay_commands_slave where id in (:a1, :a2) and completed_at is not null), 2,
  'both have completed_at');
select results_eq('select relay_states from relay_slaves where slave_mac_address = ''14:33:5C:38:BF:60''',
  $$values ('{t,f,f,f,f,f,f,f}'::boolean[])$$,
  'the completed command''s action is recorded; the failed one changes no relay');

-- Idempotence: the same batch again, with other figures, and the opposite outcomes.
select results_eq(
  format($q$select id, status, execution_time_ms, error_message from complete_slave_commands(%L)$q$,
         jsonb_build_array(
           jsonb_build_object('command_id', :a1, 'status', 'completed', 'execution_time_ms', 999),
           jsonb_build_object('command_id', :a2, 'status', 'failed', 'error_message', 'other reason'))),
  format('values (%s::bigint, %L::text, 100, null::text), (%s::bigint, %L::text, 20, %L::text)',
         :a1, 'completed', :a2, 'failed', 'slave offline'),
  'the same batch again changes nothing and returns the first results');
select results_eq(
  format($q$select id, status from complete_slave_commands(%L)$q$,
         jsonb_build_array(
           jsonb_build_object('command_id', :a1, 'status', 'failed', 'error_message', 'late failure'),
           jsonb_build_object('command_id', :a2, 'status', 'completed'))),
  format('values (%s::bigint, %L::text), (%s::bigint, %L::text)', :a1, 'completed', :a2, 'failed'),
  'a completed command cannot be failed, nor a failed one completed; the caller learns the real status');
select results_eq(format('select status, execution_time_ms from complete_slave_command(%s, 5)', :a1),
  $$values ('completed'::text, 100)$$, 'complete_slave_command agrees: the command stays as the batch left it');
select results_eq('select relay_states from relay_slaves where slave_mac_address = ''14:33:5C:38:BF:60''',
  $$values ('{t,f,f,f,f,f,f,f}'::boolean[])$$, 'repeating the batch records no relay states');

-- Two commands on one slave in one batch: applied in the batch's order, the last action wins.
select is(
  (select count(*)::int from complete_slave_commands(
     format('[{"command_id": %s, "status": "completed"}, {"command_id": %s, "status": "completed"}]', :b1, :b2)::jsonb)),
  2, 'two commands on one slave complete in one batch');
select results_eq('select relay_states, relay_count from relay_slaves where slave_mac_address = ''14:33:5C:38:BF:61''',
  $$values ('{f,f,t,f,f,f,f,f}'::boolean[], 8)$$,
  'relays 1 and 2 on, then relay 1 off: relay 1 is off and relay 2 on (a new slave has 8 relays)');
select is((select count(*)::int from relay_slaves where slave_mac_address = '14:33:5C:38:BF:61'), 1,
  'the slave has one row');

-- Reported relay states replace the computed ones, and later actions apply on top of them.
select is(
  (select count(*)::int from complete_slave_commands(
     format('[{"command_id": %s, "status": "completed", "relay_states": [false, true, true, false, false, false, false, false, true, true]},
              {"command_id": %s, "status": "completed", "execution_time_ms": null, "relay_states": null}]', :c1, :c2)::jsonb)),
  2, 'a batch with reported relay states completes');
select results_eq('select relay_states, relay_count from relay_slaves where slave_mac_address = ''14:33:5C:38:BF:62''',
  $$values ('{f,t,t,t,f,f,f,f,t,t}'::boolean[], 10)$$,
  'the reported states (10 relays) replace the computed ones, then relay 3 is switched on by the later command');

-- Someone else's command is skipped and unchanged.
select is(
  (select array_agg(id order by id) from complete_slave_commands(
     format('[{"command_id": %s, "status": "completed"}, {"command_id": %s, "status": "failed", "error_message": "x"}, {"command_id": 999999999, "status": "completed"}]',
            :bob1, :stale)::jsonb)),
  array[:stale::bigint], 'bob''s command and an unknown id are not returned to alice''s agent');
select tests.as_superuser();
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{1,0}', '{on,off}', '{0,0}') returning id as a3 \gset
select results_eq(format('select status, completed_at, locked_at from relay_commands_slave where id = %s', :bob1),
  $$values ('pending'::text, null::timestamptz, null::timestamptz)$$, 'bob''s command is unchanged');
select is((select count(*)::int from relay_slaves where master_device_id = 'ESP32_BOB_1'), 0,
  'no relay states are recorded for bob''s slave');

-- An expired command stays expired.
select results_eq(format('select status, error_message, completed_at from relay_commands_slave where id = %s', :stale),
  $$values ('expired'::text, 'expired before delivery'::text, null::timestamptz)$$,
  'the expired command is unchanged by the batch that tried to fail it');
select tests.as_agent('pi-alice');
select is((select status from complete_slave_commands(format('[{"command_id": %s, "status": "completed"}]', :a3)::jsonb)),
  'completed', 'a pending command can be completed in a batch too');
select results_eq('select relay_states from relay_slaves where slave_mac_address = ''14:33:5C:38:BF:60''',
  $$values ('{f,t,f,f,f,f,f,f}'::boolean[])$$, 'a known slave''s states are updated from what they were');
select results_eq(
  format($q$select status, execution_time_ms, completed_at from complete_slave_commands('[{"command_id": %s, "status": "completed", "execution_time_ms": 5}]')$q$, :stale),
  $$values ('expired'::text, null::integer, null::timestamptz)$$, 'completing an expired command returns it expired and unchanged');

-- Refused batches: nothing changes.
select tests.as_superuser();
select throws_ok(
  format('select * from complete_slave_commands(%L)',
         (select jsonb_agg(jsonb_build_object('command_id', g, 'status', 'completed')) from generate_series(1, 101) g)),
  '22023', 'p_completions may hold at most 100 completions, got 101', 'a batch of 101 is refused');
insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{5}', '{on}', '{0}') returning id as d1 \gset
select tests.as_agent('pi-alice');
select throws_ok(
  format('select * from complete_slave_commands(%L)',
         format('[{"command_id": %s, "status": "completed"}, {"command_id": 999999998, "status": "failed"}]', :d1)),
  '22023', 'p_completions[1].error_message is required for a failed command', 'a failure without a reason is refused');
select throws_ok(
  format('select * from complete_slave_commands(%L)',
         format('[{"command_id": %s, "status": "completed"}, {"command_id": %s, "status": "completed"}]', :d1, :d1)),
  '22023', format('p_completions[1].command_id %s appears more than once', :d1), 'a command twice in one batch is refused');
select throws_ok($$select * from complete_slave_commands('{"command_id": 1}')$$,
  '22023', 'p_completions must be a JSON array of completions', 'an object instead of an array is refused');
select is((select status from relay_commands_slave where id = :d1), 'pending', 'a refused batch changes nothing');

select tests.as_anon();
select throws_ok('select * from complete_slave_commands(''[]'')', '42501', null, 'anon cannot call complete_slave_commands');

-- The edge's times: when the master answered and when the command went out.
select tests.as_superuser();
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '10 minutes', now() + interval '1 hour') as timed \gset
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '10 minutes', now() + interval '1 hour') as ahead \gset
select tests.as_agent('pi-alice');
select throws_ok(
  format('select * from complete_slave_commands(%L)',
         format('[{"command_id": %s, "status": "completed", "finished_at": "last tuesday-ish"}]', :timed)),
  '22023', 'p_completions[0].finished_at must be null or an RFC 3339 time', 'a time that is not one is refused');
select is((select count(*)::int from complete_slave_commands(format(
  '[{"command_id": %s, "status": "completed", "finished_at": "%s", "sent_at": "%s"},
    {"command_id": %s, "status": "completed", "finished_at": "2999-01-01T00:00:00Z"}]',
  :timed, now() - interval '8 minutes', now() - interval '9 minutes', :ahead)::jsonb)), 2,
  'a batch with the edge''s times completes');
select tests.as_superuser();
select is((select completed_at from relay_commands_slave where id = :timed), now() - interval '8 minutes',
  'completed_at is when the master answered, not when the report arrived');
select is((select sent_at from relay_commands_slave where id = :timed), now() - interval '9 minutes',
  'sent_at is when the edge sent the command');
select is((select completed_at from relay_commands_slave where id = :ahead), now(),
  'a time in the future (an edge clock ahead) is recorded as now');

select * from finish();
rollback;
