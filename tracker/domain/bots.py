"""Link-preview bots and crawlers: their clicks are stored flagged and never attributed."""
from __future__ import annotations

import re
from functools import lru_cache

# Link unfurlers of messengers and social networks (they fetch every shared link), search and SEO
# crawlers, and headless tools. Matched case-insensitively anywhere in the User-Agent.
_BOT = re.compile(
    r"facebookexternalhit|facebookcatalog|meta-externalagent|twitterbot|slackbot|slack-imgproxy"
    r"|telegrambot|whatsapp|discordbot|linkedinbot|skypeuripreview|vkshare|redditbot|pinterest"
    r"|embedly|iframely|mastodon|pleroma|misskey|bluesky|cardyb|viber|snapchat|line-poker|kakaotalk"
    r"|googlebot|google-inspectiontool|adsbot-google|mediapartners-google|feedfetcher-google"
    r"|google-read-aloud|bingbot|bingpreview|yandex(?:bot|images|metrika|mobilebot)|baiduspider"
    r"|duckduckbot|applebot|petalbot|semrushbot|ahrefsbot|mj12bot|dotbot|bytespider|gptbot"
    r"|chatgpt-user|claudebot|amazonbot|qwantify|outbrain|headlesschrome|phantomjs|python-requests"
    r"|python-urllib|go-http-client|curl/|wget/|libwww|scrapy"
    r"|\bbot\b|crawler|spider|preview",
    re.IGNORECASE,
)


@lru_cache(maxsize=4096)
def is_bot(user_agent: str) -> bool:
    if not user_agent:
        return True  # browsers always send one; a bare fetch is a tool
    return _BOT.search(user_agent) is not None
