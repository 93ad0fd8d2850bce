"""The web chat page in a real browser (headless Chromium driven by Selenium):
`python -m pytest -q tests/test_chat_page.py`.

It needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and skips without
them. The page talks to a real server on the quick pipeline's SFT model; a prompt whose greedy
reply runs long is picked through the API, to watch a reply stream and to stop one.
"""

import json
import shutil
import time
import urllib.request

import pytest

from tests.runs import SERVE_MAX_NEW

webdriver = pytest.importorskip('selenium.webdriver')
CHROMIUM, DRIVER = shutil.which('chromium'), shutil.which('chromedriver')
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason='needs chromium and chromium-driver (apt)')
MAX_NEW = SERVE_MAX_NEW  # leaves 72 tokens of the context for the conversation
PROMPTS = ['Tell me everything.', 'hello there', 'Write a long story.', 'What is 12 plus 30?',
           'List every colour you know.', 'Explain the rules of chess.']
# Records every text the newest assistant bubble shows, and (when armed) presses Stop at the
# first text it shows.
WATCH = '''
window.shown = []; window.stopAtFirst = arguments[0];
new MutationObserver(() => {
  const bubbles = document.querySelectorAll('.assistant');
  const last = bubbles[bubbles.length - 1];
  const text = last ? last.querySelector('.text').textContent : '';
  if (text && text !== window.shown[window.shown.length - 1]) {
    window.shown.push(text);
    if (window.stopAtFirst) {
      window.stopAtFirst = false;
      document.getElementById('stop').click();
    }
  }
}).observe(document.getElementById('messages'),
           {childList: true, subtree: true, characterData: true});
'''


@pytest.fixture(scope='module')
def server(sft_server):
    return sft_server


@pytest.fixture(scope='module')
def long_prompt(server):
    """A prompt whose greedy reply is long, and that reply."""
    for prompt in PROMPTS:
        reply = api_reply(server, [{'role': 'user', 'content': prompt}], MAX_NEW)
        if len(reply) >= 16:
            return prompt, reply
    pytest.fail('no prompt gets a long reply from the quick SFT model')


@pytest.fixture(scope='module')
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                 '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', '--window-size=1000,800'):
        options.add_argument(flag)
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL', 'performance': 'ALL'})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def api_reply(server, messages, max_tokens):
    body = json.dumps({'messages': messages, 'temperature': 0, 'max_tokens': max_tokens})
    request = urllib.request.Request(server + '/v1/chat/completions', data=body.encode(),
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())['choices'][0]['message']['content']


def wait_for(predicate, timeout=60):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline
        time.sleep(0.05)


def open_page(browser, server, stop_at_first=False):
    browser.get(server + '/')
    wait_for(lambda: 'step' in browser.find_element('id', 'model').text)
    browser.execute_script("document.getElementById('temperature').value = '0';")
    browser.execute_script(WATCH, stop_at_first)


def say(browser, text):
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element('id', 'input')
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait_for(lambda: not browser.find_element('id', 'send').get_property('disabled'))


def assistant_texts(browser):
    return [e.text for e in browser.find_elements('css selector', '.assistant .text')]


def test_a_conversation_streams_and_matches_the_api(browser, server, long_prompt, tmp_path):
    """The reply appears piece by piece and equals the API's greedy reply; the second turn
    carries the first, and HTML in it is shown as text; no console errors, nothing fetched from
    another host."""
    open_page(browser, server)
    model = browser.find_element('id', 'model').text
    assert model.startswith('sft: sft model, step') and 'parameters' in model
    prompt, first = long_prompt
    say(browser, prompt)
    shown = browser.execute_script('return window.shown;')
    assert len(shown) >= 2 and shown[-1] == first  # it grew while streaming
    assert assistant_texts(browser) == [first]
    hostile = '<img src=x onerror="hacked=1">'
    say(browser, hostile)
    second = api_reply(server, [{'role': 'user', 'content': prompt},
                                {'role': 'assistant', 'content': first},
                                {'role': 'user', 'content': hostile}], MAX_NEW)
    assert assistant_texts(browser) == [first, second]
    assert browser.find_elements('css selector', '.user')[1].text == hostile
    assert not browser.find_elements('css selector', '#messages img')
    assert browser.execute_script('return window.hacked;') is None
    assert not [e for e in browser.get_log('browser') if e['level'] == 'SEVERE']
    hosts = {json.loads(e['message'])['message'].get('params', {}).get('request', {}).get('url')
             for e in browser.get_log('performance')} - {None}
    assert hosts and all(u.startswith((server, 'data:')) for u in hosts), hosts
    browser.save_screenshot(str(tmp_path / 'chat.png'))


def test_stop_ends_a_reply_and_errors_are_shown(browser, server, long_prompt):
    """Stop, pressed at the reply's first text, ends it there and gives the input back; a
    prompt longer than the server takes shows the server's message."""
    open_page(browser, server, stop_at_first=True)
    question, full = long_prompt
    say(browser, question)
    stopped = assistant_texts(browser)[0]
    assert len(stopped) < len(full) and full.startswith(stopped)
    assert '(stopped)' in browser.find_element('css selector', '.assistant').text
    assert browser.find_element('id', 'input').is_enabled()
    browser.execute_script(WATCH, False)
    say(browser, 'word ' * 200)
    error = browser.find_elements('css selector', '.error')
    assert error and 'tokens' in error[-1].text
