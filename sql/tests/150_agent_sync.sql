-- sync_agent: one call per agent per tick (docs/decisions/0021-one-sync-per-agent.md): idle
-- answers, what moves the counters and what does not, commands in the seed's order with limits
-- per master and in total, fairness under a backlog, retries, lock timeouts, callers.
begin;
\ir fixtures/world.sql
select plan(43);

-- pi-alice serves two masters here.
insert into public.device_status (device_id, owner_id, agent_id, mac_address) values
  ('ESP32_ALICE_3', 'a0000000-0000-0000-0000-000000000001', 'pi-alice', '24:6F:28:00:00:05');

create function tests.sync(p_cursor jsonb, p_per int default 5, p_total int default 100,
                           p_request text default null, p_masters text[] default null)
returns jsonb language sql as $$
  select public.sync_agent(p_cursor, p_masters, p_per, p_total, 30, p_request) $$;
grant execute on function tests.sync(jsonb, int, int, text, text[]) to public;
create temporary table answers (step text primary key, answer jsonb);
grant all on answers to public;

-- A first call reads everything and gives the cursor.
select tests.as_agent('pi-alice');
insert into answers values ('first', tests.sync('{}'));
select is((select answer ->> 'idle' from answers where step = 'first'), 'false', 'a first call is not idle');
select ok((select answer -> 'cursor' ?& array['commands', 'rules', 'configs', 'macros', 'latch'] from answers where step = 'first'),
  'the answer carries a counter per part');
select is((select jsonb_array_length(answer -> 'configs') from answers where step = 'first'), 2,
  'the configs of both masters of the agent');
select ok((select answer ? 'latch' and answer ? 'macros' and answer ? 'rules' from answers where step = 'first'),
  'a first call reads the latch, the macros and the rules');

-- The same cursor again: idle.
select is(tests.sync((select answer -> 'cursor' from answers where step = 'first')), '{"idle": true}'::jsonb,
  'nothing moved: the answer is idle');

-- What an agent does not need to hear of leaves it idle: presence, the engine's last_error,
-- another agent's command.
select tests.as_superuser();
update public.device_status set is_online = true, last_seen = now(), wifi_rssi = -50 where device_id = 'ESP32_ALICE_1';
insert into public.decision_rules (device_id, rule_id, rule_name, rule_json)
values ('ESP32_ALICE_2', 'R_OTHER', 'other agent''s rule', '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}');
select tests.command('ESP32_BOB_1');
select tests.command('ESP32_ALICE_2');
select tests.as_agent('pi-alice');
select is(tests.sync((select answer -> 'cursor' from answers where step = 'first')), '{"idle": true}'::jsonb,
  'presence updates and other agents'' rules and commands leave the agent idle');

-- A dashboard command for one of its masters: the next call locks it.
select tests.as_alice();
select tests.command('ESP32_ALICE_1') as cmd_a \gset
select tests.as_agent('pi-alice');
insert into answers values ('cmd', tests.sync((select answer -> 'cursor' from answers where step = 'first'), 5, 100, 'request-0001'));
select is((select answer ->> 'idle' from answers where step = 'cmd'), 'false', 'a new command ends the idle answers');
select results_eq(
  $$select (c ->> 'id')::bigint from answers, jsonb_array_elements(answer -> 'commands') c where step = 'cmd'$$,
  format('values (%s::bigint)', :cmd_a), 'the new command is handed out');
select ok(not ((select answer from answers where step = 'cmd') ?| array['rules', 'configs', 'macros', 'latch']),
  'only the part that moved is read');
select tests.as_superuser();
select is((select status || ' ' || locked_by || ' ' || delivery_count from relay_commands_slave where id = :cmd_a),
  'processing agent:pi-alice 1', 'it is locked by the agent, as get_and_lock_slave_commands locks');
select is((select status from relay_commands_slave where master_device_id = 'ESP32_ALICE_2' limit 1), 'pending',
  'another agent''s master is untouched');
select tests.as_agent('pi-alice');

-- A retry of that call (its answer lost) gets the same command; nothing new is locked.
select tests.as_alice();
select tests.command('ESP32_ALICE_1') as cmd_b \gset
select tests.as_agent('pi-alice');
select results_eq(
  $$select (c ->> 'id')::bigint from jsonb_array_elements(tests.sync((select answer -> 'cursor' from answers where step = 'first'), 5, 100, 'request-0001') -> 'commands') c$$,
  format('values (%s::bigint)', :cmd_a), 'a retried request id returns what the lost call locked, and nothing new');
-- The agent's first call after a failure asks for no new commands while completions wait; with
-- a current cursor it would be idle. It still gets what the lost call locked.
select results_eq(
  $$select (c ->> 'id')::bigint from jsonb_array_elements(tests.sync((select answer -> 'cursor' from answers where step = 'cmd'), 0, 0, 'request-0001') -> 'commands') c$$,
  format('values (%s::bigint)', :cmd_a), 'a retry asking for no new commands still gets what the lost call locked');
select tests.as_superuser();
select is((select status from relay_commands_slave where id = :cmd_b), 'pending', 'the retry locked nothing new');
select is((select delivery_count from relay_commands_slave where id = :cmd_a), 1, 'nor handed the first out twice');
select tests.as_agent('pi-alice');
insert into answers values ('next', tests.sync((select answer -> 'cursor' from answers where step = 'cmd'), 5, 100, 'request-0002'));
select results_eq(
  $$select (c ->> 'id')::bigint from answers, jsonb_array_elements(answer -> 'commands') c where step = 'next'$$,
  format('values (%s::bigint)', :cmd_b), 'the next call (a new request id) hands out the new command');
select is(tests.sync((select answer -> 'cursor' from answers where step = 'next'), 5, 100, 'request-0003'), '{"idle": true}'::jsonb,
  'and after it the agent is idle again');

-- While completions are due the agent asks for no locks: nothing is locked and the commands
-- counter stays where the cursor had it.
select tests.as_alice();
select tests.command('ESP32_ALICE_1') as cmd_c \gset
select tests.as_agent('pi-alice');
insert into answers values ('nolock', tests.sync((select answer -> 'cursor' from answers where step = 'next'), 5, 0, 'request-0004'));
select is((select answer ->> 'idle' from answers where step = 'nolock'), 'true',
  'with a total of 0 a new command does not end the idle answers');
select tests.as_superuser();
select is((select status from relay_commands_slave where id = :cmd_c), 'pending', 'and nothing is locked');
select tests.as_agent('pi-alice');
insert into answers values ('after_nolock', tests.sync((select answer -> 'cursor' from answers where step = 'next'), 5, 100, 'request-0005'));
select results_eq(
  $$select (c ->> 'id')::bigint from answers, jsonb_array_elements(answer -> 'commands') c where step = 'after_nolock'$$,
  format('values (%s::bigint)', :cmd_c), 'asked again with locks allowed, the command is handed out');

-- The seed's order and the per-master limit; what the limit left is handed out next tick, with
-- no new command in between.
select tests.as_superuser();
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '50 s') as manual_old \gset
select tests.command('ESP32_ALICE_1', 'manual', 90, now() - interval '40 s') as manual_high \gset
select tests.command('ESP32_ALICE_1', 'rule', 50, now() - interval '30 s') as rule_mid \gset
select tests.command('ESP32_ALICE_1', 'peristaltic', 10, now() - interval '20 s') as peri_low \gset
select tests.command('ESP32_ALICE_1', 'rule', 50, now() - interval '35 s') as rule_older \gset
select tests.command('ESP32_ALICE_1', 'automation', 50, now() - interval '10 s') as auto_mid \gset
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '45 s') as manual_new \gset
select tests.as_agent('pi-alice');
insert into answers values ('order', tests.sync((select answer -> 'cursor' from answers where step = 'after_nolock'), 5, 100, 'request-0006'));
select results_eq(
  $$select (c ->> 'id')::bigint from answers, jsonb_array_elements(answer -> 'commands') c where step = 'order'$$,
  format('values (%s::bigint), (%s), (%s), (%s), (%s)', :peri_low, :rule_older, :rule_mid, :auto_mid, :manual_high),
  'five per master, peristaltic > rule > automation > manual, then priority, then age');
insert into answers values ('rest', tests.sync((select answer -> 'cursor' from answers where step = 'order'), 5, 100, 'request-0007'));
select results_eq(
  $$select (c ->> 'id')::bigint from answers, jsonb_array_elements(answer -> 'commands') c where step = 'rest'$$,
  format('values (%s::bigint), (%s)', :manual_old, :manual_new),
  'the same cursor again hands out what the limit left (no new command needed)');
select is(tests.sync((select answer -> 'cursor' from answers where step = 'rest'), 5, 100, 'request-0008'), '{"idle": true}'::jsonb,
  'then idle');

-- A lock that times out: time passes (the locks and the row's due time move back 31 s).
select tests.as_superuser();
update relay_commands_slave set locked_at = locked_at - interval '31 seconds' where id = :rule_mid;
update private.agent_sync_state set commands_due_at = commands_due_at - interval '31 seconds' where agent_id = 'pi-alice';
select tests.as_agent('pi-alice');
select results_eq(
  $$select (c ->> 'id')::bigint, (c ->> 'delivery_count')::int from jsonb_array_elements(tests.sync((select answer -> 'cursor' from answers where step = 'rest'), 5, 100, 'request-0009') -> 'commands') c$$,
  format('values (%s::bigint, 2)', :rule_mid),
  'a lock older than the timeout is handed out again with no counter moved, as a second delivery');

-- Fairness: one master with 2,000 pending, the other with one; the first tick has both.
select tests.as_superuser();
update relay_commands_slave set status = 'completed' where master_device_id = 'ESP32_ALICE_1' and status = 'processing';
insert into public.relay_commands_slave
  (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, priority)
select 'ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', 50 from generate_series(1, 2000);
select tests.command('ESP32_ALICE_3', 'manual', 10) as lone \gset
select tests.as_agent('pi-alice');
insert into answers values ('backlog', tests.sync((select answer -> 'cursor' from answers where step = 'rest'), 100, 100, 'request-0010'));
select is((select jsonb_array_length(answer -> 'commands') from answers where step = 'backlog'), 100,
  'a backlog is drained 100 at a time');
select ok((select bool_or((c ->> 'id')::bigint = :lone) from answers, jsonb_array_elements(answer -> 'commands') c where step = 'backlog'),
  'the other master''s single command is in the first batch');
select is((select count(*) from answers, jsonb_array_elements(answer -> 'commands') c
            where step = 'backlog' and c ->> 'master_device_id' = 'ESP32_ALICE_1'), 99::bigint,
  'the backlog takes the rest of the batch');
insert into answers values ('backlog2', tests.sync((select answer -> 'cursor' from answers where step = 'backlog'), 100, 100, 'request-0011'));
select is((select jsonb_array_length(answer -> 'commands') from answers where step = 'backlog2'), 100,
  'the next tick takes the next 100 without a new command');
select tests.as_superuser();
select is((select count(*) from relay_commands_slave where master_device_id = 'ESP32_ALICE_1' and status = 'pending'), 1801::bigint,
  'exactly the handed-out commands are locked');
update relay_commands_slave set status = 'cancelled' where master_device_id = 'ESP32_ALICE_1' and status in ('pending', 'processing');

-- p_masters: a master the agent does not run is neither locked nor read.
select tests.command('ESP32_ALICE_3', 'manual', 10) as unrun \gset
select tests.as_agent('pi-alice');
insert into answers values ('filtered', tests.sync((select answer -> 'cursor' from answers where step = 'backlog2'), 5, 100, 'request-0012', array['ESP32_ALICE_1']));
select is((select coalesce(jsonb_array_length(answer -> 'commands'), 0) from answers where step = 'filtered'), 0,
  'a master left out of p_masters is not locked');
select tests.as_superuser();
select is((select status from relay_commands_slave where id = :unrun), 'pending', 'its command stays pending');

-- Rules, the latch, configs and macros each move their own counter.
select tests.as_alice();
insert into public.decision_rules (device_id, rule_id, rule_name, rule_json)
values ('ESP32_ALICE_3', 'R_NEW', 'new rule', '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}');
select tests.as_agent('pi-alice');
insert into answers values ('rule', tests.sync((select answer -> 'cursor' from answers where step = 'backlog2'), 5, 0));
select is((select answer -> 'rules' -> 0 ->> 'rule_id' from answers where step = 'rule'), 'R_NEW', 'a new rule comes in the next answer');
select ok(not ((select answer from answers where step = 'rule') ?| array['configs', 'macros', 'latch']), 'alone');
select is((select jsonb_array_length(tests.sync((select answer -> 'cursor' from answers where step = 'rule')
                                                 || jsonb_build_object('rules', 0, 'rule_cursors', jsonb_build_object('ESP32_ALICE_3', jsonb_build_object('since', (select answer -> 'rules' -> 0 ->> 'changed_at' from answers where step = 'rule'), 'after', (select answer -> 'rules' -> 0 ->> 'id' from answers where step = 'rule')))), 5, 0) -> 'rules')),
  0, 'rule changes start after the master''s cursor');
select tests.as_superuser();
update public.decision_rules set last_error = 'engine says no' where rule_id = 'R_NEW';
select tests.as_agent('pi-alice');
select is(tests.sync((select answer -> 'cursor' from answers where step = 'rule'), 5, 0), '{"idle": true}'::jsonb,
  'the engine''s own last_error does not count as a change');

select tests.as_alice();
insert into public.system_status (owner_id, emergency_stop, emergency_reason)
values ('a0000000-0000-0000-0000-000000000001', true, 'test');
select tests.as_agent('pi-alice');
select is(tests.sync((select answer -> 'cursor' from answers where step = 'rule'), 5, 0) -> 'latch' ->> 'emergency_stop', 'true',
  'the owner''s latch comes in the next answer');
select tests.as_agent('pi-alice-2');
select ok(tests.sync('{}') ? 'latch', 'to every agent of the owner');

select tests.as_alice();
update public.device_status set config = '{"sample_interval_ms": 1000}', config_version = 2 where device_id = 'ESP32_ALICE_3';
insert into public.macros (owner_id, agent_id, name) values ('a0000000-0000-0000-0000-000000000001', 'pi-alice', 'flush');
select tests.as_agent('pi-alice');
insert into answers values ('cfg', tests.sync((select answer -> 'cursor' from answers where step = 'rule') || '{"latch": null}', 5, 0));
select is((select c ->> 'config_version' from answers, jsonb_array_elements(answer -> 'configs') c
            where step = 'cfg' and c ->> 'device_id' = 'ESP32_ALICE_3'), '2', 'a new config version comes in the next answer');
select is((select answer -> 'macros' -> 0 ->> 'name' from answers where step = 'cfg'), 'flush', 'and a new macro');

-- Who may sync.
select tests.as_alice();
select throws_ok($$select tests.sync('{}')$$, '42501', null, 'a dashboard user''s token does not sync');
select tests.as_agent('pi-revoked');
select throws_ok($$select tests.sync('{}')$$, '42501', null, 'nor a revoked agent''s');
select tests.as_agent('pi-bob');
select is((select coalesce(jsonb_array_length(tests.sync('{}') -> 'configs'), 0)), 1,
  'another owner''s agent sees only its own master');
select throws_ok($$select tests.sync('{}', 101)$$, '22023', 'p_limit_per_master must be between 0 and 100, got 101',
  'a limit above 100 is refused by name');

select * from finish();
rollback;
